"""keysvc: the HSM-backed key and certificate service for the SMETS1 migration."""
__version__ = "0.1.0"
