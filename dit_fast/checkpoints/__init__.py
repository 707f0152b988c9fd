"""DiT weights in every format: official ``.pt`` files, train.py dicts, the dit-fast format, diffusers folders.

- ``load_checkpoint(path, model_cls=...)``: any supported file or folder -> a ``Checkpoint`` with the model built
  (``read_checkpoint``: the weights and config only). Reading: ``read``; config inference for files that store
  none: ``infer``; diffusers' key layout: ``diffusers_layout``.
- ``save_checkpoint`` (dit-fast format), ``save_official``, ``save_diffusers``, ``convert`` (``write``);
  ``dit-fast convert`` is ``dit_fast.commands.convert``.

docs/checkpoints.md describes the formats, where to get the official weights, and the rules of config inference.
"""

from dit_fast.checkpoints.diffusers_layout import (
    config_from_diffusers,
    from_diffusers_state_dict,
    to_diffusers_config,
    to_diffusers_state_dict,
    with_diffusers_conditioning,
)
from dit_fast.checkpoints.format import FORMAT_VERSION, FORMATS, Checkpoint, CheckpointError
from dit_fast.checkpoints.infer import check_state_dict, expected_shapes, infer_config
from dit_fast.checkpoints.read import (
    check_finite_weights,
    describe_load_error,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
)
from dit_fast.checkpoints.write import convert, save_checkpoint, save_diffusers, save_official, write_checkpoint

__all__ = ["FORMATS", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "check_finite_weights", "check_state_dict",
           "config_from_diffusers", "convert", "describe_load_error", "expected_shapes", "from_diffusers_state_dict",
           "infer_config", "load_checkpoint", "model_from_checkpoint", "read_checkpoint", "save_checkpoint",
           "save_diffusers", "save_official", "to_diffusers_config", "to_diffusers_state_dict",
           "with_diffusers_conditioning", "write_checkpoint"]
