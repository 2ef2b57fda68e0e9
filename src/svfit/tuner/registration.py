"""Register SVFit with PEFT, once per process, so that get_peft_model / PeftModel.from_pretrained know it."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import SVFitConfig
from .model import SVFitModel
from .peft_type import NAME, SVFIT_PEFT_TYPE


def register() -> None:
    """Idempotent: a second import (or a reload of svfit) must not trip PEFT's duplicate-name check."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(SVFIT_PEFT_TYPE) is SVFitModel:
        return
    if SVFIT_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        # registered by an earlier copy of this module (e.g. importlib.reload): point PEFT at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[SVFIT_PEFT_TYPE] = SVFitConfig
        PEFT_TYPE_TO_TUNER_MAPPING[SVFIT_PEFT_TYPE] = SVFitModel
        return
    register_peft_method(name=NAME, config_cls=SVFitConfig, model_cls=SVFitModel, prefix=SVFitModel.prefix)
