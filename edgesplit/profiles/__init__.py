"""Device profiles (Raspberry Pi, Jetson, laptops) and, later, split-point profiling. No torch here."""

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
