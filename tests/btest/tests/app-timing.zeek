# Application-layer timing on server-first ports (app.zeek): tapp is the
# client's first data minus the darknet's banner as the sensor saw them, and
# app_data the first 64 bytes of that data (base64). Scripts/mkapp.py lists
# the cases: an SSH exchange answered 37.5 ms after the banner (and one over
# IPv6 after 20.25 ms), a 100-byte SMTP line cut to 64 bytes, binary Telnet
# negotiation, a port-80 exchange (not server-first: no tapp, published at
# the ACK as before), a client that never sends (published app_wait after
# its ACK, here at the next packet 0.1 s later), an SSH client that sends its
# version before the banner (tapp from its next data, app_data its version),
# a FIN without banner and a RST after the banner (neither is waited on:
# published at app_wait as well), a RST answering the SYN+ACK, a client that
# speaks before the banner and never after (no tapp), a version racing the
# banner (arriving sooner than a quarter of the handshake's RTT after it: not
# an answer), and a handshake still held when the trace ends (published as Zeek
# stops). "at" is the network time of the publication. Written by
# reasoning, then checked on Zeek 8.0.10 and 7.0.11.
#
# @TEST-EXEC: python3 $SCRIPTS/mkapp.py app.pcap
# @TEST-EXEC: zeek -b -r app.pcap $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output

# Set, not added to: zkg runs this suite after its build step wrote the
# operator's settings into site.zeek, which the package loads.
redef StepStone::darknet_subnets = {
	198.18.0.0/15,
	[2001:db8:ffff::]/48
};
redef StepStone::websocket_port = 0/tcp;
redef StepStone::server_first_ports = {
	21/tcp,
	22/tcp,
	23/tcp,
	25/tcp
};
redef StepStone::app_wait = 5sec;

function secs(i: interval): string
	{
	return fmt("%.6f", interval_to_double(i));
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	local reply = h$reply == "" ? "none" : h$reply;
	local tp = h?$tp ? secs(h$tp) : "-";
	local tapp = h?$tapp ? secs(h$tapp) : "-";
	local data = h?$app_data ? h$app_data : "-";
	local n = h?$app_data ? |decode_base64(h$app_data)| : 0;
	print fmt("%s %d -> %d reply=%s tp=%s tapp=%s at=%.6f", h$orig_h,
	    port_to_count(h$orig_p), port_to_count(h$resp_p), reply, tp, tapp,
	    time_to_double(network_time()));
	print fmt("    app_data=%s (%d bytes)", data, n);
	}

event zeek_done()
	{
	print fmt("held at the end: %d", |StepStone::apps|);
	}
