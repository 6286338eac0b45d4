"""sgm.modules: the host reaches `sgm.modules.GeneralConditioner` through this package."""

from sgm.modules.encoders.modules import GeneralConditioner

__all__ = ["GeneralConditioner"]
