"""Using a trained model: the export stage, the serving formats, the evaluate stage, imgclf-predict."""
