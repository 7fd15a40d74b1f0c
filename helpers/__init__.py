"""The course package: what the chapters have shown, saved, plus plumbing; one module per idea.

Read it from the bottom up: `core` (conversions, devices, seeding); `runs`, `synthetic`, `images`;
`datasets`, `scan`, `data`, `augment`, `loading`, `models`, `tta`; `losses`, `evaluate`, `train`,
`gradcam`, `reporting`; `plots`; `ood`; the `exercises` package on top. A module only
imports from its own floor or below (README, "The package helpers"). Importing `helpers` imports
nothing else. Not here: the app's backend (app/), run records and results tables (coursebuild/),
the TensorFlow Lite weight converter (tools/).
"""

__version__ = "0.1.0"
