"""Webhooks: store, SSRF guard, Standard Webhooks signing, HTTP sender, dispatcher and delivery task."""
