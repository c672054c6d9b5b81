"""Dynamic-inference evaluation for every technique: MACs, anytime prediction, budgeted batch.

`macs`, `anytime`, `budgeted`, `early_exit` and `outputs` are pure torch functions; `callbacks`
wraps them for Lightning, `plots` draws the figures. `outcomes` (each test image's prediction at
every exit and budget level), `bootstrap` and `comparison` are numpy only: what a report ranks
runs with. Nothing here imports techniques or apps.
"""
