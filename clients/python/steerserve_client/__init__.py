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
from .steering import (
    Attention,
    AttentionMode,
    Conjugate,
    EosRamp,
    Experts,
    KeyRange,
    Logits,
    Prompt,
    Rules,
    Sink,
    Span,
    Steering,
    Urial,
    VectorItem,
)

# The public API, pinned by tests/clients/test_sdk_offline.py: adding or removing a name is a deliberate change.
__all__ = [
    "APIConnectionError",
    "Applied",
    "AsyncProfiles",
    "AsyncSteerClient",
    "AsyncSteeredStream",
    "Attention",
    "AttentionMode",
    "AuthenticationError",
    "Conjugate",
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
    "Prompt",
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
    "Urial",
    "VectorItem",
    "__version__",
]
