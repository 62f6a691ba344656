"""The tasks a run can learn. Each module registers its task type, model types and presets
(``dualroute.train.registry``); a new application is a new module here and one import line below.

- ``lm``: next-token prediction (``TransformerLM``) on text or token files;
- ``image``: image classification (``ViTClassifier``) on digits, MNIST, CIFAR-10.
"""

from dualroute.train.tasks import image, lm  # noqa: F401  (registration)
from dualroute.train.tasks.base import (Batch, EvalResult, Task, make_task, to_device, tokenizer_from_record,
                                        tokenizer_record)
from dualroute.train.tasks.image import ImageTask
from dualroute.train.tasks.lm import LMTask

__all__ = ["Batch", "EvalResult", "ImageTask", "LMTask", "Task", "make_task", "to_device", "tokenizer_from_record",
           "tokenizer_record"]
