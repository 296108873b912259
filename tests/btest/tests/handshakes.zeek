# One StepStone::handshake per darknet connection, with T^p by Karn's rule,
# the reply kind and the raw SYN frame (Scripts/mkpcap.py lists the cases).
# Written by reasoning, then checked on Zeek 8.0.10 and 7.0.11: what they
# print is what was reasoned. Traces/handshakes.pcap is the recorded trace
# (handshakes-recorded.zeek); this one adds the cases it lacks. A handshake
# to a server-first port (22, 23) answered by an ACK waits app_wait (5 s)
# for a banner exchange that never comes (app.zeek), hence the order.
#
# @TEST-EXEC: python3 $SCRIPTS/mkpcap.py handshakes.pcap
# @TEST-EXEC: zeek -b -r handshakes.pcap $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output

# Set, not added to: zkg runs this suite after its build step wrote the
# operator's settings into site.zeek, which the package loads. A listener
# would also keep Zeek running after the trace.
redef StepStone::darknet_subnets = {
	198.18.0.0/15,
	[2001:db8:ffff::]/48
};
redef StepStone::websocket_port = 0/tcp;
redef StepStone::reply_wait = 2sec;

function secs(i: interval): string
	{
	return fmt("%.6f", interval_to_double(i));
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	local reply = h$reply == "" ? "none" : h$reply;
	local tp = h?$tp ? secs(h$tp) : "-";
	local reply_at = h?$reply_epoch ? secs(h$reply_epoch) : "-";
	local vlan = h?$vlan ? cat(h$vlan) : "-";
	local frame = |decode_base64(h$syn)|;
	local orig_p = port_to_count(h$orig_p);
	local resp_p = port_to_count(h$resp_p);
	local syn = secs(h$syn_epoch);
	print fmt("%s %d -> %s %d reply=%s synacks=%d/%d tp=%s syn=%s reply_at=%s",
	    h$orig_h, orig_p, h$resp_h, resp_p, reply, h$synack_count,
	    |h$synacks|, tp, syn, reply_at);
	print fmt("    frame=%d encap=%s l3=%s vlan=%s dlt=%d uid=%s", frame, h$encap,
	    h$l3, vlan, h$link_type, h$uid);
	}
