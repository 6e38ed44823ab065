"""Built-in update codecs (the ``codec`` role): none, fp16, bf16, int8, topk, zstd.

Each is declared in fedplug's pyproject.toml under ``fedplug.codecs`` and
selected with ``codec=<name>`` (config files in ``conf/codec/``).  Their byte
formats are documented in docs/protocol.md ("Update codecs"), so a client in
another language can encode them.
"""
