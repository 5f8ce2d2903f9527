"""Who may call keysvc. Admission on every call is `admission.py`; the package imports
nothing, so that a certificate's fingerprint (`certificates.py`) serves the client's
`admin deny` and `admin allow` without the server's dependencies."""
