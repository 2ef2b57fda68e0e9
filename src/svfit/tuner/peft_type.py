"""Make ``PeftType.SVFIT`` exist.

PEFT has no plug-in discovery: ``register_peft_method`` only accepts names that are already members of the
``PeftType`` enum (kept that way on purpose upstream, huggingface/peft#2282). Extending the enum is the one way to
get a first-class type, which ``adapter_config.json``, ``get_model_status()`` and PEFT's error paths all read.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import PeftType

NAME = "svfit"

if NAME.upper() not in PeftType.__members__:
    extend_enum(PeftType, NAME.upper(), NAME.upper())

SVFIT_PEFT_TYPE = PeftType[NAME.upper()]
