"""Privacy and security: consent, identity, PII minimisation, erasure, access to the surfaces."""
