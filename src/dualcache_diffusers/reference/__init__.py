"""Small trained reference models (digits DiT, PixArt and classifier) shipped with the package."""
