"""Self-configuring bundles: measure a dataset (fingerprint), decide the bundle settings from it (plan).

* :mod:`medkd.planning.fingerprint`: what the data are (spacing, sizes, intensities, classes, lateral classes);
* :mod:`medkd.planning.lateral`: lateral classes, by name and by position;
* :mod:`medkd.planning.plan`: the planners, which decide the settings from a fingerprint, with a reason for each;
* :mod:`medkd.planning.planfile`: the plan file, and the bundles' entry points (:func:`bundle_plan`, :func:`show_plan`);
* :mod:`medkd.planning.transforms`: the planned normalisation and augmentation as MONAI transforms.

See ``docs/planning.md``.
"""

from medkd.planning.plan import make_settings, scale_channels, validation_interval
from medkd.planning.planfile import (
    PLAN_FILE,
    BundlePlan,
    auto_plan,
    bundle_plan,
    data_file,
    lateral_flips,
    lateral_rot90,
    load_or_make,
    make_plan,
    read_plan,
    show_plan,
    summary,
)
from medkd.planning.transforms import NormalizeIntensityd, augmentations

__all__ = [
    "PLAN_FILE",
    "BundlePlan",
    "NormalizeIntensityd",
    "augmentations",
    "auto_plan",
    "bundle_plan",
    "data_file",
    "lateral_flips",
    "lateral_rot90",
    "load_or_make",
    "make_plan",
    "make_settings",
    "read_plan",
    "scale_channels",
    "show_plan",
    "summary",
    "validation_interval",
]
