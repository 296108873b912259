# The package parses on this Zeek with the WebSocket listener configured (the
# @if branch for this version's listen_websocket), and the redefs zkg's
# configure-site writes from the user variables take effect. Checked on Zeek
# 8.0.10 and 7.0.11 (the listener at work: websocket-listener). A copy of the
# package with an empty site.zeek: under zkg, the operator's settings are in
# the package's own one.
#
# @TEST-EXEC: cp -R $PACKAGE pkg && : >pkg/site.zeek
# @TEST-EXEC: sh $PACKAGE/configure-site "198.18.0.0/15, 2001:db8:ffff::/48" ::1 27759 listen.zeek
# @TEST-EXEC: zeek -b -a ./pkg ./listen.zeek
# @TEST-EXEC: sh $PACKAGE/configure-site "198.18.0.0/15 2001:db8:ffff::/48" "" "" nolisten.zeek
# @TEST-EXEC: zeek -b ./pkg ./nolisten.zeek %INPUT > output
# @TEST-EXEC: btest-diff output
# @TEST-EXEC-FAIL: sh $PACKAGE/configure-site "198.18.0.0" "" "" bad.zeek

event zeek_init()
	{
	local subnets = StepStone::darknet_subnets;
	print |subnets|, 198.18.3.4 in subnets, [2001:db8:ffff::1] in subnets,
	    192.0.2.1 in subnets, StepStone::websocket_port,
	    StepStone::websocket_addr;
	}
