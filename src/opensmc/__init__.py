"""OpenSMC: a self-hosted Server Migration Center speaking the SMC 2019-06-01 OpenAPI."""

__version__ = "0.1.0"
API_VERSION = "2019-06-01"
