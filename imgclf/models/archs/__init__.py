"""One file per architecture (a family of close variants may share one): each registers its
builder with ``@architecture`` (imgclf/models/registry.py), which imports every module here."""
