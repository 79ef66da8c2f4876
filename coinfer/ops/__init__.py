"""Operations: provisioning the production broker, and the walk through the README's deployment steps."""
