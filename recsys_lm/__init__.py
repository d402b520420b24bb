"""recsys-lm: recommendation with pretrained language models on PyTorch Lightning."""

import logging

from recsys_lm.launch import naming as _naming  # noqa: F401  registers ${job_dirname:...} (conf/hydra)

__version__ = "0.1.0"

# transformers imports torchao (the int8 export flavour's library) whenever it is installed,
# and torchao then logs warnings about CUDA kernels a CPU machine cannot load and about enum
# registrations torch deprecates: import-time noise on every run, not anything to act on.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
