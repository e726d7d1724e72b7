"""lorag: LoRA adapters for behaviour, Milvus knowledge bases for facts, served together on Ray.

Modules (each owns one noun): config, models, embed, data (documents -> knowledge bases),
milvus, retrieval, adapters (the store), train, serving, cluster, cli.
Importing lorag does no I/O.
"""

__version__ = "0.1.0"
