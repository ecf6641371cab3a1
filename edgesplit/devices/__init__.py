"""Device profiles (Raspberry Pi, Jetson, laptops): the built-in TOML files beside `profiles.py`, and the code
that reads and writes them. It sits below the client, which reads profiles on the device (energy estimates, the
cut choice), and imports nothing of edgesplit's but the exceptions; the split-point profiler (`edgesplit.profiles`)
sits above client and server and reads them too."""

from __future__ import annotations

from edgesplit.devices.profiles import (
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
