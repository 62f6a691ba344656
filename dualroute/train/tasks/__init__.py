"""The tasks a run can learn. Every module of this package is imported here, and each registers its task
type, model types and presets (``dualroute.train.registry``): a new application is a new module, with no
edit anywhere else.

- ``lm``: next-token prediction (``TransformerLM``) on text or token files;
- ``image``: image classification (``ViTClassifier``) on digits, MNIST, CIFAR-10.
"""

import importlib
import pkgutil

from dualroute.train.tasks.base import (Batch, EvalResult, Task, make_task, to_device, tokenizer_from_record,
                                        tokenizer_record)

_OTHERS = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "lm", "image"))
for _module in ("lm", "image", *_OTHERS):  # registration, in the order presets are listed
    importlib.import_module(f"{__name__}.{_module}")

from dualroute.train.tasks.image import ImageTask  # noqa: E402
from dualroute.train.tasks.lm import LMTask  # noqa: E402

__all__ = ["Batch", "EvalResult", "ImageTask", "LMTask", "Task", "make_task", "to_device", "tokenizer_from_record",
           "tokenizer_record"]
