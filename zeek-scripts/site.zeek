##! Site settings. Empty in the repository; ``zkg install`` overwrites this
##! file with redefs built from the package's user variables
##! (STEPSTONE_DARKNET, STEPSTONE_WS_ADDR, STEPSTONE_WS_PORT), see
##! ``configure-site``. Elsewhere, redef the options in local.zeek instead.
