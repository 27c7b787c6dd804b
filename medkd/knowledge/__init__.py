"""The knowledge model: routes and route kinds, their losses, the feature layers read, the teacher's roles.

Importing the package registers the built-in route kinds (the registry, :data:`medkd.knowledge.route.ROUTE_KINDS`, is
filled by the modules that define them), so that a route can name them whatever module of it is imported first.
"""

from __future__ import annotations

from medkd import lazy_submodules
from medkd.knowledge import distribution_kinds, route_kinds  # noqa: F401  (the built-in kinds register themselves)

__getattr__ = lazy_submodules(__name__)
