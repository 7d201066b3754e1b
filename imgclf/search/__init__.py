"""`imgclf-search`: an Optuna study whose trials are DVC experiments (docs/search.md).

No stage imports this package: a trial reaches its study through environment variables that
imgclf/train/trial_report.py reads, so an edit here reruns no stage.
"""
