"""Subject-driven text-to-image generation (DreamBooth) with SVFit on diffusers.

* :mod:`.pipeline` loads a local diffusers text-to-image directory (UNet2DConditionModel, a text encoder and its
  tokenizer, a noise scheduler, optionally a VAE);
* :mod:`.train` is the DreamBooth loop (rare-token prompt, prior-preservation loss) for SVFit, LoRA or full
  fine-tuning, all through PEFT's ``get_peft_model``;
* :mod:`.sampling` samples with DDIM and classifier-free guidance and writes PNG grids;
* :mod:`.demo` is a small text-to-image model this project pre-trained on Fashion-MNIST with ankle boots held out,
  with a 10-class judge, so that subject fidelity and prior preservation can be measured offline.

The command line is ``svfit dreambooth``; the benchmark is ``python -m benchmarks run --only dreambooth``.
"""

from .._extras import require

require("svfit.dreambooth", "diffusers")

from .pipeline import TextToImage, check_pipeline_dir, load_pipeline
from .sampling import sample, save_grid
from .train import DreamBoothConfig, finetune, load_trained, peft_config

__all__ = ["DreamBoothConfig", "TextToImage", "check_pipeline_dir", "finetune", "load_pipeline", "load_trained",
           "peft_config", "sample", "save_grid"]
