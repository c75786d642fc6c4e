"""Data files shipped with spanet: the embedded digits set (``digits.npz``; source and licence in ``README.md``)."""
