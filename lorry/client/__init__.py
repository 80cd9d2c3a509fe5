"""The typed admin-API client."""

from lorry.client.calls import UNSET
from lorry.client.clients import AsyncCloudApiClient, CloudApiClient
from lorry.client.errors import CloudApiError
from lorry.client.models import DeploymentScope

__all__ = ["UNSET", "AsyncCloudApiClient", "CloudApiClient", "CloudApiError", "DeploymentScope"]
