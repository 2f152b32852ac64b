"""Wire protocols, transport-free: bytes and dicts in, arrays and bytes out."""
