#!/bin/sh
# Entry point of the container image: runs misskey-gateway with the given
# arguments ("serve" by default). A TOML file mounted at
# /etc/misskey-gateway/gateway.toml is used as the config file unless
# MISSKEY_GATEWAY_CONFIG already names one; environment variables override it.
set -eu

default_config=/etc/misskey-gateway/gateway.toml
if [ -z "${MISSKEY_GATEWAY_CONFIG:-}" ] && [ -f "$default_config" ]; then
    export MISSKEY_GATEWAY_CONFIG="$default_config"
fi
exec misskey-gateway "$@"
