"""data_prep: read raw labeled text, tokenize it once, window long documents, write Arrow shards + a manifest.

The manifest (``manifest.json``) is the one contract between data_prep and train.
"""

__version__ = "0.1.0"
# Bump when the shard columns or manifest keys change incompatibly; train refuses other versions.
FORMAT_VERSION = 1
