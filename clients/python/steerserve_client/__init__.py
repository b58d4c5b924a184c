"""steerserve-client: a typed Python SDK for steerserve (steering specs, steered calls, profiles, typed errors)."""
from .__version__ import __version__
from .client import AsyncSteerClient, SteerClient
from .errors import (
    APIConnectionError,
    AuthenticationError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProfileNotFound,
    ServerError,
    SteeringError,
    SteerServeError,
)
from .profiles import AsyncProfiles, Profile, Profiles
from .results import Applied, AsyncSteeredStream, SteeredResponse, SteeredStream
from .steering import Attention, EosRamp, Experts, KeyRange, Logits, Rules, Sink, Span, Steering

# The public API, pinned by tests/clients/test_sdk_offline.py: adding or removing a name is a deliberate change.
__all__ = [
    "APIConnectionError",
    "Applied",
    "AsyncProfiles",
    "AsyncSteerClient",
    "AsyncSteeredStream",
    "Attention",
    "AuthenticationError",
    "EosRamp",
    "Experts",
    "InvalidRequest",
    "KeyRange",
    "Logits",
    "NotFound",
    "PermissionDenied",
    "Profile",
    "ProfileNotFound",
    "Profiles",
    "Rules",
    "ServerError",
    "Sink",
    "Span",
    "SteerClient",
    "SteerServeError",
    "SteeredResponse",
    "SteeredStream",
    "Steering",
    "SteeringError",
    "__version__",
]
