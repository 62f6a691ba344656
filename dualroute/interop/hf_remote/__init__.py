"""The two files ``dualroute convert RUN OUT --to hf`` copies into a custom-code export (Hugging Face's
``trust_remote_code`` format): ``configuration_dualroute.py`` and ``modeling_dualroute.py``.

They are written for transformers, not for dualroute: importing them needs transformers, and
``dualroute.interop`` never imports them (``export.py`` copies their text).
"""
