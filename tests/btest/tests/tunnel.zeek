# A darknet handshake that arrives inside a tunnel Zeek decapsulates
# (IP-in-IP, Scripts/ipip.py) is published with its timing and without SYN
# bytes: the frame in hand is the outer packet, and so is the packet header
# (no $tcp in it), which must not stop the handshake.
#
# @TEST-EXEC: python3 $SCRIPTS/ipip.py tunnel.pcap
# @TEST-EXEC: zeek -b -r tunnel.pcap $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output
# @TEST-EXEC: test ! -s reporter.log || ! grep -q "expression error" reporter.log

redef StepStone::darknet_subnets = {198.18.0.0/15};
redef StepStone::websocket_port = 0/tcp;
redef StepStone::reply_wait = 2sec;

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	print fmt("%s %s -> %s %s reply=%s synacks=%d tp=%s syn_bytes=%d", h$orig_h,
	    h$orig_p, h$resp_h, h$resp_p, h$reply, h$synack_count, h?$tp ? fmt(
	    "%.6f", interval_to_double(h$tp)) : "-", |h$syn|);
	}
