"""Dynamic-inference evaluation for every technique: MACs, anytime prediction, budgeted batch.

`macs`, `anytime`, `budgeted`, `early_exit` and `outputs` are pure torch functions; `callbacks`
wraps them for Lightning, `plots` draws the figures. Nothing here imports techniques or apps.
"""
