"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) on the text manager's chat."""
