"""Photo processing: thumbnails with Pillow, from images the producer references by path."""
