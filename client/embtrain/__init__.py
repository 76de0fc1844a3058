"""embtrain client SDK."""
