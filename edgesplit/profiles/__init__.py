"""Device profiles (Raspberry Pi, Jetson, laptops; `devices.py`, below the client, no torch) and the split-point
profiler (`splitpoint.py` and its parts, above client and server). Importing this package loads only the profiles."""

from __future__ import annotations

from edgesplit.profiles.devices import (
    ENERGY_READERS,
    DeviceProfile,
    LinkProfile,
    ProfileError,
    list_profiles,
    load_profile,
    save_profile,
)

__all__ = [
    "ENERGY_READERS",
    "DeviceProfile",
    "LinkProfile",
    "ProfileError",
    "list_profiles",
    "load_profile",
    "save_profile",
]
