"""Limits on what unauthenticated callers can cost: failed sign-ins and refused
token requests counted in the database, and password verifications bounded per
process."""
