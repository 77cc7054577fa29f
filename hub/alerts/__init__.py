"""Alerting adapters: the rules file, receivers, the notification dispatcher."""
