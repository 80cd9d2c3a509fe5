"""Lorry: an OpenAI-compatible gateway that publishes LoRA adapters at their own subdomain."""

__version__ = "0.1.0"

from lorry.client import AsyncCloudApiClient, CloudApiClient, CloudApiError, DeploymentScope
from lorry.credentials import Credentials, default_cloud_api_url, ensure_credentials

__all__ = [
    "AsyncCloudApiClient",
    "CloudApiClient",
    "CloudApiError",
    "Credentials",
    "DeploymentScope",
    "__version__",
    "default_cloud_api_url",
    "ensure_credentials",
]
