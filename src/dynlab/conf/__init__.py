"""dynlab's Hydra configs, shipped inside the package (`pkg://dynlab.conf`) so that an installed
dynlab finds them; `experiment/` holds the presets of `experiments/` (a link in the source tree,
copied into the wheel)."""
