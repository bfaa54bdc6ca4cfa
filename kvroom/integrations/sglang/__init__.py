"""kvroom as an SGLang transfer backend: ``--disaggregation-transfer-backend kvroom``.

Installed with ``pip install kvroom[sglang]``; SGLang finds it through its
plugin entry-point group ``sglang.srt.plugins`` (:func:`plugin.register`),
which adds the backend name ``kvroom`` to ``TransferBackend`` and answers
``get_kv_class`` for it with the classes of :mod:`kvroom.integrations.sglang.conn`.
Importing this package imports nothing of SGLang.
"""

TESTED_SGLANG_VERSION = "0.5.23"
"""The SGLang release this adapter was written and tested against."""

BACKEND_NAME = "kvroom"
"""The value of ``--disaggregation-transfer-backend`` that selects kvroom."""

__all__ = ["BACKEND_NAME", "TESTED_SGLANG_VERSION"]
