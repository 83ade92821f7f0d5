"""Guest images built from Debian packages and cached under ``$XDG_CACHE_HOME/smolvmm``: ``guest``
(the default guest), ``disk`` (ext4 images), ``cache`` (where they live)."""
