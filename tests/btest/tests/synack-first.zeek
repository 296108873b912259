# A SYN+ACK captured before its SYN (three connections of the real
# Traces/vnc-scanner.pcap, history Hs^ in conn.log) is not a SYN: every
# published SYN frame is a pure SYN from the connection's client. With no
# darknet set, every connection counts. Checked on Zeek 8.0.10 and 7.0.11.
#
# @TEST-EXEC: zeek -b -C -r $TRACES/vnc-scanner.pcap $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output

redef StepStone::darknet_subnets = set();
redef StepStone::websocket_port = 0/tcp;

global syns = 0;
global others = 0;
global from_servers = 0;

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	local frame = decode_base64(h$syn);
	# Ethernet, then IPv4 (every frame of this trace): TCP flags at 13.
	local th = 14 + ( bytestring_to_count(frame[14]) % 16 ) * 4;
	local f = bytestring_to_count(frame[th + 13]);
	# SYN among SYN/ACK/RST/FIN; ECN bits may be set.
	if ( ( f & 0x17 ) == 2 )
		++syns;
	else
		++others;
	if ( h$orig_p == 5900/tcp )
		++from_servers;
	}

event zeek_done()
	{
	print fmt("SYN frames: %d, other frames: %d", syns, others);
	print fmt("handshakes from a VNC server's port: %d", from_servers);
	}
