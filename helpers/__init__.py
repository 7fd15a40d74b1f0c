"""Plumbing shared by the course notebooks, one module per idea.

Read it from the bottom up: `core` (conversions, devices, seeding); `config` and `synthetic`;
`datasets`, `data`, `augment`, `loading`, `models`, `tta`; `losses`, `train`, `feature_cache`, `evaluate`,
`gradcam`, `reporting`; `plots`; `ood`, `export` (the app's backend is in app/). A module only
imports from its own floor or below (README, "The package helpers"). Importing `helpers` imports
nothing else.
"""

__version__ = "0.1.0"
