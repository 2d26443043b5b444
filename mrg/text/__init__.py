"""Report text: the bottom layer every other part may import (no torch, no other ``mrg`` layer)."""
