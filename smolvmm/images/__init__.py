"""Guest images built from Debian packages and cached under ``$XDG_CACHE_HOME/smolvmm``."""

from smolvmm.images.disk import ext4_image
from smolvmm.images.guest import GuestImage, default_guest

__all__ = ["GuestImage", "default_guest", "ext4_image"]
