"""Real third-party-shaped Pyramid apps, compared directly and behind each front."""
