"""reactor: turns inbound leads into worked sales opportunities in Twenty CRM, by reacting to events."""
